"""MQTT notices from the cloud: device accounts issued at enrollment (kept hashed), the
broker's password and access-control files, and the publisher of each device's signed
desired state. Only `notifier` imports paho."""
