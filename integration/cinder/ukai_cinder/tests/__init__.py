# Cinder's test package monkey-patches eventlet: it must be imported
# before anything starts a thread or a socket.
import cinder.tests.unit  # noqa: F401
