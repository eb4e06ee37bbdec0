"""dwfl-edge aggregation server (DESIGN §8): enrollment, signed requests, sealed updates, DW-FL rounds."""
