"""Locust users, load shapes, the CGNAT population and media metrics (import name
``turnstorm.loadgen``). gevent/Locust are imported only below this package."""
