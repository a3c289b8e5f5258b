"""The packet-fault harness behind ``nox -s netfault``: two namespaces, a TUN relay, a tagged server, clients."""
