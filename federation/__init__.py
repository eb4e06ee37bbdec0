"""Federation shared by the simulation and the aggregation server: numpy (and the runtime's MODALITIES and errors) only."""
