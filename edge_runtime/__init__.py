"""dwfl-edge clinic runtime: verified bundles, local inference and profiling. No torch here."""

__version__ = "0.1.0"
MODALITIES: tuple[str, ...] = ("ct", "pathology", "genomics")
