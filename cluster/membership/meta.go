package membership

import (
	"encoding/json"
	"fmt"
	"maps"

	"github.com/hashicorp/memberlist"
)

// MetaMaxSize is the largest encoded [NodeMeta] a node may gossip
// (memberlist.MetaMaxSize).
const MetaMaxSize = memberlist.MetaMaxSize

// NodeMeta is what each node gossips about itself. It travels as JSON in
// memberlist's node meta, which must fit in [MetaMaxSize] bytes: keep
// labels short.
type NodeMeta struct {
	API   string `json:"api"`   // HTTP API "ip:port"
	ISCSI string `json:"iscsi"` // iSCSI target portal "host:port" initiators use
	// Port is the node's target port (and portal group) number, the
	// same on every path of an image (docs/hypervisor.md); 0: not known.
	Port     uint16            `json:"port,omitempty"`
	Peer     string            `json:"peer"` // node-to-node data "ip:port"
	Labels   map[string]string `json:"labels,omitempty"`
	Capacity int64             `json:"cap"`  // bytes
	Free     int64             `json:"free"` // bytes
	Version  string            `json:"ver,omitempty"`
}

// clone returns a copy that shares no map with m.
func (m NodeMeta) clone() NodeMeta {
	m.Labels = maps.Clone(m.Labels)
	return m
}

// encodeMeta returns the wire form of m, or an error if it does not fit.
func encodeMeta(m NodeMeta) ([]byte, error) {
	b, err := json.Marshal(m)
	if err != nil {
		return nil, fmt.Errorf("membership: encode node meta: %w", err)
	}
	if len(b) > MetaMaxSize {
		return nil, fmt.Errorf("membership: node meta is %d bytes encoded, the limit is %d", len(b), MetaMaxSize)
	}
	return b, nil
}

// decodeMeta parses a peer's meta. Peers are not trusted: oversized or
// malformed meta yields an empty NodeMeta and an error to log.
func decodeMeta(b []byte) (NodeMeta, error) {
	var m NodeMeta
	if len(b) == 0 {
		return m, nil
	}
	if len(b) > MetaMaxSize {
		return NodeMeta{}, fmt.Errorf("node meta is %d bytes, the limit is %d", len(b), MetaMaxSize)
	}
	if err := json.Unmarshal(b, &m); err != nil {
		return NodeMeta{}, fmt.Errorf("node meta is not valid: %w", err)
	}
	return m, nil
}
