"""The transforms, one module each: ``Step -> Step`` handlers of the core primitives."""
