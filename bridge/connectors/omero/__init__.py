"""OMERO connector: a torch-free core over plain shapes (:mod:`.core`), the
omero.model conversions (:mod:`.model`), pixels around clicks
(:mod:`.pixels`), the thin BlitzGateway layer (:mod:`.gateway`) and the
OMERO.web script's job (:mod:`.script`).
"""
