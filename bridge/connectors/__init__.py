"""Connectors: take the clicks from where annotators work, put the nuclei back there.

Each connector is split in two so that everything but the remote calls is
tested with real files and no server:

* a core that knows GeoJSON-shaped objects, image files and the segmenter
  (passed in as a parameter: connectors never import torch), and
* a thin layer over the client library (paquo for QuPath, omero-py for OMERO) that only reads and
  writes objects.

QuPath: :mod:`bridge.connectors.qupath.objects` (points, markers, detections),
:mod:`bridge.connectors.qupath.run` (planning, segmentation, safe writes),
:mod:`bridge.connectors.qupath.images` (local pixels),
:mod:`bridge.connectors.qupath.paquo` (paquo); the tests stand in for the paquo layer
with an in-memory double (``tests/support/qupath_memory.py``).
"""
