package node

import (
	"testing"

	"github.com/ukai-storage/ukai/api"
	"github.com/ukai-storage/ukai/cluster/meta"
)

func TestMergeQoS(t *testing.T) {
	n := func(v int64) *int64 { return &v }
	old := &meta.QoS{IOPSLimit: 100, IOPSBurst: 300, BWLimit: 1 << 20}
	for _, c := range []struct {
		name string
		req  api.QoSRequest
		want meta.QoS
	}{
		{"only what is given changes", api.QoSRequest{ReadIOPSLimit: n(50)}, meta.QoS{IOPSLimit: 100, IOPSBurst: 300, BWLimit: 1 << 20, ReadIOPSLimit: 50}},
		{"a new limit keeps its burst", api.QoSRequest{IOPSLimit: n(200)}, meta.QoS{IOPSLimit: 200, IOPSBurst: 300, BWLimit: 1 << 20}},
		{"a limit of 0 takes its burst", api.QoSRequest{IOPSLimit: n(0)}, meta.QoS{BWLimit: 1 << 20}},
		{"a burst of 0 is the default again", api.QoSRequest{IOPSBurst: n(0)}, meta.QoS{IOPSLimit: 100, BWLimit: 1 << 20}},
		{"clear, then what is given", api.QoSRequest{Clear: true, WriteBWLimit: n(5)}, meta.QoS{WriteBWLimit: 5}},
	} {
		got := mergeQoS(old, c.req)
		if *got != c.want {
			t.Errorf("%s: %+v, want %+v", c.name, *got, c.want)
		}
		if got == old {
			t.Errorf("%s: the old record's value was changed in place", c.name)
		}
	}
	if *old != (meta.QoS{IOPSLimit: 100, IOPSBurst: 300, BWLimit: 1 << 20}) {
		t.Fatalf("old changed: %+v", *old)
	}
	if got := mergeQoS(old, api.QoSRequest{Clear: true}); !got.Zero() {
		t.Fatalf("clear: %+v", *got)
	}
}
