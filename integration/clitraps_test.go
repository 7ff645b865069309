package integration

import (
	"encoding/json"
	"strings"
	"testing"

	"github.com/ukai-storage/ukai/api"
)

// TestPolicySetChangesOnlyWhatIsGiven: `policy set` keeps the fields it is
// not given (a rate set after a window used to drop the window), clears
// one field with --clear-window or --clear-rate, and refuses an image or a
// node that does not exist (it used to keep a policy that never applied).
func TestPolicySetChangesOnlyWhatIsGiven(t *testing.T) {
	n := newNode(t, "n1")
	n.start()
	n.mustCLI("image", "create", "vm1", "--size", "16M", "--block-size", "1M")
	policy := func() (api.SyncPolicy, bool) {
		t.Helper()
		var p api.SyncPolicies
		if err := json.Unmarshal([]byte(n.mustCLI("policy", "show", "-o", "json")), &p); err != nil {
			t.Fatal(err)
		}
		sp, ok := p.Images["vm1"]
		return sp, ok
	}
	n.mustCLI("policy", "set", "--image", "vm1", "--sync-window", "01:00-05:00", "--tz", "Asia/Tokyo")
	n.mustCLI("policy", "set", "--image", "vm1", "--max-rate", "20M")
	if p, ok := policy(); !ok || len(p.Windows) != 1 || p.Windows[0].Start != 60 || p.TZ != "Asia/Tokyo" || p.MaxRate != 20<<20 {
		t.Fatalf("after a window then a rate: %+v (present %v), want both and the zone", p, ok)
	}
	n.mustCLI("policy", "set", "--image", "vm1", "--clear-rate")
	if p, _ := policy(); len(p.Windows) != 1 || p.MaxRate != 0 {
		t.Fatalf("after --clear-rate: %+v, want the window kept and no rate", p)
	}
	n.mustCLI("policy", "set", "--image", "vm1", "--clear-window", "--max-rate", "5M")
	if p, _ := policy(); len(p.Windows) != 0 || p.MaxRate != 5<<20 || p.TZ != "Asia/Tokyo" {
		t.Fatalf("after --clear-window --max-rate 5M: %+v", p)
	}
	n.mustCLI("policy", "set", "--image", "vm1", "--clear")
	if p, ok := policy(); ok {
		t.Fatalf("after --clear: %+v still there", p)
	}
	for _, tc := range []struct {
		args []string
		want string
	}{
		{[]string{"policy", "set", "--image", "nosuch", "--max-rate", "1M"}, "no image nosuch"},
		{[]string{"policy", "set", "--node", "nosuch", "--max-rate", "1M"}, "no node nosuch"},
		{[]string{"policy", "set", "--image", "vm1", "--clear-rate", "--max-rate", "1M"}, "give one of each pair"},
	} {
		out, errOut, err := n.cli(tc.args...)
		if err == nil || !strings.Contains(errOut, tc.want) {
			t.Errorf("ukai %s: %v, want an error naming %q\n%s%s", strings.Join(tc.args, " "), err, tc.want, out, errOut)
		}
	}
	n.mustCLI("policy", "set", "--node", "n1", "--max-rate", "10M")
}

// TestResizeRelativeAndMinCopies: `image resize vm1 +1M` grows by 1M;
// `--min-copies 0` is refused (it was taken as the default, 1).
func TestResizeRelativeAndMinCopies(t *testing.T) {
	n := newNode(t, "n1")
	n.start()
	n.mustCLI("image", "create", "vm1", "--size", "16M", "--block-size", "1M")
	n.mustCLI("image", "resize", "vm1", "+1M")
	n.mustCLI("image", "resize", "vm1", "+3M")
	if sz := n.imageJSON("vm1", false)["size"]; sz != float64(20<<20) {
		t.Fatalf("after +1M and +3M: size %v, want %d", sz, 20<<20)
	}
	if _, errOut, err := n.cli("image", "resize", "vm1", "+0"); err == nil || !strings.Contains(errOut, "grows by nothing") {
		t.Fatalf("resize +0: %v %s", err, errOut)
	}
	if _, errOut, err := n.cli("image", "create", "vm2", "--size", "16M", "--min-copies", "0"); err == nil || !strings.Contains(errOut, "at least 1") {
		t.Fatalf("create --min-copies 0: %v %s", err, errOut)
	}
}
