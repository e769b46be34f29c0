"""Features: one streaming pass -> per-feature statistics and examples in a SQLite feature database."""

from monoscope.features.db import DB_NAME, FeatureDB, FeatureDBError

__all__ = ["DB_NAME", "FeatureDB", "FeatureDBError"]
