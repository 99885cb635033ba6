"""mteb-steer: steer a frozen embedding model at retrieval time, evaluated with mteb.

Importing the package registers its steered models with mteb (metadata only, no weights): the
named presets and every configuration under the folders in `$MTEB_STEER_RESULTS`; then
`mteb.get_model(name, revision)` and `mteb.get_model_meta(name, revision)` rebuild them.
`register_results(folder)` adds another results folder.
"""

from mteb_steer.registry import register_from_environment, register_presets, register_results

register_presets()
register_from_environment()

__all__ = ["register_results"]
