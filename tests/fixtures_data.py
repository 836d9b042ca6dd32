"""Fixture writers in the public dataset formats (re-exported from vaopd_jax.data.fixtures)."""

from vaopd_jax.data.fixtures import (  # noqa: F401
    encode_image,
    line_drawing,
    write_geometry3k,
    write_virl39k_embedded,
    write_virl39k_raw,
)
