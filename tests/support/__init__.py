"""What the tests share: real servers and raw peers on loopback, the wire model."""
