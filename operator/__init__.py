"""The kopf operator (import name ``turnstorm.operator``): thin handlers, reconcile
functions, pure renderers. kopf is imported only below this package."""
