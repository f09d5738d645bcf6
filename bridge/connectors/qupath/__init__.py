"""QuPath connector: points, markers and our nuclei (detections, or the
extension's annotations) as GeoJSON-shaped objects (:mod:`.objects`),
planning, the orphan rule and safe writes (:mod:`.run`, :mod:`.safe_save`),
local pixels (:mod:`.images`) and the thin paquo layer (:mod:`.paquo`).
"""
