"""Lightning integration: the pretraining LightningModule, optimizer setup and callbacks."""
