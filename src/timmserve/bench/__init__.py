"""`timmserve bench`: ceilings, load, monitoring, the configuration ladder and its report."""
