"""Federation shared by the simulation and the aggregation server: numpy only."""
