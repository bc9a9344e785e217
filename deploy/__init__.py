"""Scale-out on Ray Serve (optional extra: ``pip install -r requirements-ray.txt``); see ``deploy/ray_serve.py``."""
