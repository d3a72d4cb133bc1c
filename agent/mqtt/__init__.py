"""MQTT on the device: desired-state notices from the cloud's broker beside the gRPC watch,
and the device's status (online, or offline by its last will). Only `notices` imports paho."""
