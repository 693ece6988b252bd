"""`ham-mlx inspect`: what each HAM layer stored, and why (score vs τ), per token; for GDN layers,
the cosine surprise of the state's own prediction (nothing is stored).

trace.py runs the model with real caches; terminal.py, report.py (HTML) and plot.py (PNG) show it.
"""

from ham_mlx.inspector.trace import LayerTrace, Trace, trace

__all__ = ["LayerTrace", "Trace", "trace"]
