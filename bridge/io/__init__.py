"""Reading and writing what users bring: image files, click tables, GeoJSON,
and the one place where level-0 pixel coordinates meet patch, tile and
downsample coordinates.
"""
