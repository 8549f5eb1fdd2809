"""The Fashion-MNIST reproduction of ``reproduce.py``: its rows, tables, plots and README update."""
