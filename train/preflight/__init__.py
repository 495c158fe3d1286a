"""The pre-flight: ahead-of-time compiles for TPU topologies or the local devices
(compile.py, topology.py), the HLO collective counter (hlo_collectives.py, which needs
only numpy: MaxText's side-by-side imports it in MaxText's environment), and the layout
of a config's parameters on a mesh (layout.py). Nothing is imported here."""
