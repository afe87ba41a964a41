"""sdmoe-train: Lightning framework for pretraining Mixture-of-Experts LLMs."""
