"""Reports of finished runs: plots and HTML (`plots.py`), metrics tables and the model card (`summary.py`)."""
