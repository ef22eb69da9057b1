"""Layer 4, the engines that run the model behind the HTTP layer: LitServe on one machine
(litserve/) and Ray Serve for more (ray.py). Neither imports the other."""
