"""On-device fine-tuning of the head (DESIGN §3, §5): numpy only, no torch on the clinic."""
