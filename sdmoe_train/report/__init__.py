"""Run dashboards from logged metrics (`sdmoe-train report`) and the SVG charts they and W&B panels use."""
