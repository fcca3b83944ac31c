"""From measured jobs to any policy: projection, its calibration and band, search, coupled groups.

May import: ``store``, ``quant``; never ``models`` or ``engine``."""
