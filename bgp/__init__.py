"""BGP control for felixpy: peers computed from Calico's resources, an ExaBGP sidecar driven through
its process API, and a BIRD route reflector rendered from the same resources."""
