"""TOML configuration of the key server and the group member, split by concern.

- :mod:`gdoid.config.model`: the frozen dataclasses the engines, daemons and
  ``phase1.py`` read (``KsConfig``, ``GmConfig``, ...).  Pure: no file access.
- :mod:`gdoid.config.errors`: :class:`~gdoid.config.errors.ConfigError`.
- :mod:`gdoid.config.loader`: ``load_ks_config`` / ``load_gm_config`` (read a file)
  and ``parse_ks_config`` / ``parse_gm_config`` (TOML text).
- :mod:`gdoid.config.table`: the validator of one TOML table (types, ranges, unknown
  keys, paths, secret files and their permissions).
- ``schema_*``: one module per group of sections (``schema_shared``: ``[ike]``,
  ``[auth]``; ``schema_ks``: ``[ks]``, KS ``[[group]]``, ``[coop]``;
  ``schema_authorization``: ``[group.authorization]``; ``schema_gm``: ``[gm]``,
  GM ``[[group]]``, ``[dataplane]``).

This package file imports nothing, so that importing the model never loads the
loader.  The layout and every key are documented in ``docs/config.md``.
"""
