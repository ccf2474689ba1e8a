"""Few-shot adaptation methods. Each module registers one method with ``@register_method``."""
