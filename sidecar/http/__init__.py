"""Sans-IO HTTP/1.1: parsing (httptools), header rules, and serialisation. No sockets here."""
