"""The Open Inference Protocol over HTTP/REST: routes (routes.py), JSON and binary bodies (codec.py), the aiohttp port (server.py)."""
