package cli

import (
	"strings"
	"testing"

	"github.com/spf13/cobra"

	"github.com/ukai-storage/ukai/api"
)

func TestQoSFlags(t *testing.T) {
	parse := func(args ...string) (api.QoSRequest, bool, error) {
		q := newQoSFlags()
		cmd := &cobra.Command{}
		q.register(cmd.Flags())
		if err := cmd.Flags().Parse(args); err != nil {
			t.Fatal(err)
		}
		req, err := q.request(cmd.Flags())
		return req, q.changed(cmd.Flags()), err
	}
	req, changed, err := parse("--iops-limit", "2000", "--bw-limit", "100M", "--write-iops-burst", "0")
	if err != nil || !changed {
		t.Fatal(err, changed)
	}
	if *req.IOPSLimit != 2000 || *req.BWLimit != 100<<20 || *req.WriteIOPSBurst != 0 || req.ReadIOPSLimit != nil || req.Clear {
		t.Fatalf("request %+v", req)
	}
	if _, changed, _ := parse(); changed {
		t.Fatal("no QoS flag, yet changed")
	}
	if req, changed, _ := parse("--clear-qos"); !changed || !req.Clear {
		t.Fatal("--clear-qos not taken")
	}
	for _, bad := range [][]string{{"--iops-limit", "-1"}, {"--iops-limit", "1.5"}, {"--iops-limit", "2k"}, {"--bw-limit", "fast"}, {"--read-bw-limit", "-3M"}} {
		if _, _, err := parse(bad...); err == nil || !strings.Contains(err.Error(), bad[0]) {
			t.Errorf("%v: %v, want an error naming the flag", bad, err)
		}
	}
	if got := qosString(api.QoS{IOPSLimit: 2000, BWLimit: 100 << 20, WriteBWLimit: 3 << 20, WriteBWBurst: 6 << 20, ReadIOPSLimit: 10, ReadIOPSBurst: 30}); got != "iops 2000/s, read iops 10/s (burst 30), bw 100M/s, write bw 3M/s (burst 6M)" {
		t.Fatalf("qosString: %q", got)
	}
	if got := qosString(api.QoS{}); got != "none" {
		t.Fatalf("qosString of nothing: %q", got)
	}
}
