"""Code shared by the scanwatch services: logging, identifiers, image preprocessing, the local
Kafka broker and the development stack. Services import from here instead of copying helpers."""
