"""The ``merge`` command line (installed as ``mergekit_lite.cli``): parse, call the
library, format the result. No merge logic lives here."""
