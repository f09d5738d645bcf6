"""NuClick's inference engine, independent of where clicks come from:
guidance maps, patches and batching, post-processing, polygons and tiled
pixel access.  Depends on :mod:`bridge.model`; knows nothing of the service
or of QuPath and OMERO.
"""
