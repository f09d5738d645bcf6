"""Connectors: take the clicks from where annotators work, put the nuclei back there.

Each connector is split in two so that everything but the remote calls is
tested with real files and no server:

* a core that knows GeoJSON-shaped objects, image files and the segmenter
  (passed in as a parameter: connectors never import torch), and
* a thin layer over the client library (paquo for QuPath, omero-py for OMERO) that only reads and
  writes objects.

QuPath: :mod:`bridge.connectors.qupath` (the tests stand in for its paquo layer
with a project kept on disk that fails where QuPath fails,
``tests/support/qupath_memory.py``).  OMERO: :mod:`bridge.connectors.omero`
(the tests use real ``omero.model`` objects in an in-memory gateway,
``tests/support/omero_memory.py``).
"""
