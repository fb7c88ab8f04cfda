"""A worked plug-in package for the CLT trainer: a nonlinearity, an activation source, an extra
loss term (each named in ``examples/plugins/config.json`` by import path) and an architecture
(``--set model.architecture=my_plugins.architecture:TiedTranscoder``). The trainer never imports
this package itself; it only has to be importable (here: ``PYTHONPATH=examples/plugins``; for a
package of your own, ``pip install -e .``)."""
