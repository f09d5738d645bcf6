"""NuClick as a network service: gRPC (``nuclick.v1.NuClick``) plus an
HTTP/JSON gateway, with request batching, limits and bearer-token auth.

Only :mod:`bridge.service.server` (and the modules it imports to run the
model) needs torch; :mod:`bridge.service.gen` and
:mod:`bridge.service.convert` are what :mod:`bridge.client` uses and stay
torch-free.
"""
