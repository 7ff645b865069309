package membership

import (
	"bytes"
	"context"
	"io"
	"log"
	"log/slog"
	"net"
	"strings"
	"testing"
	"time"

	"github.com/hashicorp/go-msgpack/v2/codec"
	"github.com/hashicorp/memberlist"
)

// rawMeta is a plain memberlist delegate gossiping arbitrary meta bytes.
type rawMeta []byte

func (m rawMeta) NodeMeta(limit int) []byte                { return m }
func (rawMeta) NotifyMsg([]byte)                           {}
func (rawMeta) GetBroadcasts(overhead, limit int) [][]byte { return nil }
func (rawMeta) LocalState(join bool) []byte                { return nil }
func (rawMeta) MergeRemoteState(buf []byte, join bool)     {}

// startRaw starts a bare memberlist node (not an Agent) gossiping meta.
func startRaw(t *testing.T, name string, meta []byte, join string) *memberlist.Memberlist {
	t.Helper()
	mc := memberlist.DefaultLANConfig()
	mc.Name = name
	mc.BindAddr, mc.BindPort = "127.0.0.1", 0
	mc.Delegate = rawMeta(meta)
	mc.Logger = log.New(io.Discard, "", 0)
	ml, err := memberlist.Create(mc)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = ml.Shutdown() })
	if _, err := ml.Join([]string{join}); err != nil {
		t.Fatal(err)
	}
	return ml
}

// Mirrors of memberlist's push/pull wire structs (net.go), to craft a
// state sync no memberlist would send: one with oversized meta.
type wirePushPullHeader struct {
	Nodes        int
	UserStateLen int
	Join         bool
}

type wirePushNodeState struct {
	Name        string
	Addr        []byte
	Port        uint16
	Meta        []byte
	Incarnation uint32
	State       memberlist.NodeStateType
	Vsn         []uint8
}

const wirePushPullMsg = 6 // memberlist's pushPullMsg

func pushRawState(t *testing.T, to string, n wirePushNodeState) {
	t.Helper()
	var buf bytes.Buffer
	buf.WriteByte(wirePushPullMsg)
	enc := codec.NewEncoder(&buf, &codec.MsgpackHandle{})
	if err := enc.Encode(&wirePushPullHeader{Nodes: 1, Join: true}); err != nil {
		t.Fatal(err)
	}
	if err := enc.Encode(&n); err != nil {
		t.Fatal(err)
	}
	c, err := net.DialTimeout("tcp", to, 2*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	_ = c.SetDeadline(time.Now().Add(5 * time.Second))
	if _, err := c.Write(buf.Bytes()); err != nil {
		t.Fatal(err)
	}
	_, _ = io.Copy(io.Discard, c) // let it answer, then merge
}

func TestMalformedPeerMeta(t *testing.T) {
	var logs captureLog
	cfg := testConfig("a1")
	cfg.Logger = slog.New(slog.NewTextHandler(&logs, &slog.HandlerOptions{Level: slog.LevelInfo}))
	a1 := startAgent(t, cfg, testMeta("a1"))
	a2 := startAgent(t, testConfig("a2", a1.Addr()), testMeta("a2"))

	// Peers gossiping meta that is not JSON, or JSON of the wrong shape.
	startRaw(t, "not-json", []byte("\x00\xffnot json{"), a1.Addr())
	startRaw(t, "wrong-types", []byte(`{"cap":"lots","labels":[1,2]}`), a1.Addr())

	// A crafted state sync announcing a node whose meta is over the limit
	// (stock memberlist refuses to send that, so speak the wire format).
	l, err := net.Listen("tcp", "127.0.0.1:0") // a free port, then closed
	if err != nil {
		t.Fatal(err)
	}
	ghost := l.Addr().(*net.TCPAddr)
	l.Close()
	pushRawState(t, a2.Addr(), wirePushNodeState{
		Name: "too-big", Addr: ghost.IP.To4(), Port: uint16(ghost.Port),
		Meta: []byte(`{"api":"` + strings.Repeat("x", 700) + `"}`), Incarnation: 1,
		State: memberlist.StateAlive, Vsn: []uint8{1, 5, 2, 0, 0, 0},
	})
	// Garbage on both of a1's sockets.
	if c, err := net.Dial("tcp", a1.Addr()); err == nil {
		_, _ = c.Write([]byte("\x06\xde\xad\xbe\xef garbage"))
		c.Close()
	}
	if c, err := net.Dial("udp", a1.Addr()); err == nil {
		_, _ = c.Write([]byte("\x04\x99\x00garbage"))
		c.Close()
	}

	for _, name := range []string{"not-json", "wrong-types", "too-big"} {
		waitFor(t, 10*time.Second, name+" listed with empty meta and logged", func() bool {
			m, ok := a1.Member(name)
			return ok && metaEqual(m.Meta, NodeMeta{}) && logs.contains("malformed meta", "member="+name)
		})
		m, _ := a1.Member(name)
		t.Logf("a1 sees %s: state=%s addr=%s meta=%+v", name, m.State, m.Addr, m.Meta)
	}
	// The well-behaved nodes are unaffected.
	m := testMeta("a2")
	if !sees(a1, "a2", StateAlive, &m) {
		t.Fatal("a1 lost a2")
	}
	if err := a1.SetMeta(context.Background(), testMeta("a1")); err != nil {
		t.Fatal(err)
	}
}
