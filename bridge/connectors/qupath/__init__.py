"""QuPath connector: points, markers and detections as GeoJSON-shaped
objects (:mod:`.objects`), planning and safe writes (:mod:`.run`), local
pixels (:mod:`.images`) and the thin paquo layer (:mod:`.paquo`).
"""
