package node

import "github.com/ukai-storage/ukai/target/iscsi"

// iscsiConfig is the portal's configuration: its address and logger, and
// the resource bounds of the iscsi section.
func (c *ISCSIConfig) iscsiConfig() iscsi.Config {
	return iscsi.Config{
		Listen:                   c.Listen,
		MaxConnections:           c.MaxConnections,
		MaxConnectionsPerAddress: c.MaxConnectionsPerAddress,
		LoginTimeout:             c.LoginTimeout,
		DataOutTimeout:           c.DataOutTimeout,
		SessionWriteBuffer:       int64(c.SessionWriteBufferMiB) << 20,
		WriteBuffer:              int64(c.WriteBufferMiB) << 20,
		ResponseQueue:            int64(c.ResponseQueueMiB) << 20,
	}
}
