"""Locust users, load shapes, the CGNAT population and media metrics (import name
``turnstorm.loadgen``). gevent/Locust are imported only below this package.

Import order rule: a process that loads both Locust and kubernetes/kopf must import Locust
first. Locust monkey-patches the standard library with gevent when it is imported; once
kubernetes (urllib3, ssl) or kopf (asyncio, aiohttp) are loaded, patching underneath them
fails (measured with Locust 2.47, kopf 1.45, kubernetes 37: ``import kopf; import
kubernetes; import locust`` dies with RecursionError). No module of this package imports
kopf or kubernetes, and the operator never imports this package;
``tests/unit/test_loadgen_import_order.py`` checks both.
"""
