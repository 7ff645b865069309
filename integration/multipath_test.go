package integration

import (
	"fmt"
	"os"
	"regexp"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/ukai-storage/ukai/cluster/consulkv/consultest"
)

// TestDiscoveryNamesEveryPath: discovery (SendTargets, through libiscsi's
// iscsi-ls) on any node answers an image with the portal of every node
// that serves it (its copies, its owner, the node asked), each in a target
// portal group of its own, at the address the node advertises
// (iscsi.advertise); every path reports the same logical unit designators
// and its own relative target port and group in VPD 0x83, and implicit
// ALUA in the standard INQUIRY data. The paths' states and their changes
// are tested through the Linux kernel's initiator (integration/vm,
// TestKernelMultipath).
func TestDiscoveryNamesEveryPath(t *testing.T) {
	c := &cluster{t: t, consul: consultest.Start(t)}
	for i, name := range []string{"n1", "n2", "n3", "n4"} {
		var join []string
		if i > 0 {
			join = []string{c.nodes[0].gossip}
		}
		n := newClusterNode(t, name, clusterOpts{consul: c.consul.Addr, join: join})
		if name == "n2" {
			// An address initiators use that is not the one bound (NAT, a
			// service address): another loopback address, which nobody
			// connects to here.
			_, port, _ := strings.Cut(n.portal, ":")
			b, err := os.ReadFile(n.cfgPath)
			if err != nil {
				t.Fatal(err)
			}
			b = []byte(strings.Replace(string(b), "iscsi:\n", fmt.Sprintf("iscsi:\n  advertise: 127.0.0.2:%s\n", port), 1))
			if err := os.WriteFile(n.cfgPath, b, 0o600); err != nil {
				t.Fatal(err)
			}
		}
		n.start()
		c.nodes = append(c.nodes, n)
	}
	n1, n2, n3, n4 := c.nodes[0], c.nodes[1], c.nodes[2], c.nodes[3]
	n1.mustCLI("image", "create", "vm1", "--size", "16M", "--block-size", "1M", "--locations", "n1,n2")
	_, n2port, _ := strings.Cut(n2.portal, ":")
	want := map[string]bool{n1.portal: true, "127.0.0.2:" + n2port: true}

	// portals lists "address,tag" of vm1 as node n's discovery answers it.
	addrRE := regexp.MustCompile(`Portal:(\S+)`)
	portals := func(n *node) []string {
		out, err := run(t, 20*time.Second, "iscsi-ls", "iscsi://"+n.portal)
		if err != nil {
			t.Fatalf("iscsi-ls on %s: %v\n%s", n.name, err, out)
		}
		var got []string
		for _, l := range strings.Split(out, "\n") {
			if !strings.Contains(l, ":vm1 ") && !strings.HasSuffix(l, ":vm1") {
				continue
			}
			for _, m := range addrRE.FindAllStringSubmatch(l, -1) {
				got = append(got, m[1])
			}
		}
		slices.Sort(got)
		return got
	}
	tags := map[string]string{} // address -> tag, the same from every node
	for _, n := range []*node{n1, n3} {
		var got []string
		// The other nodes' numbers and addresses come with gossip.
		waitFor(t, 20*time.Second, "discovery on "+n.name+" to name every path of vm1", func() bool {
			got = portals(n)
			return len(got) >= 2 && !slices.ContainsFunc(got, func(p string) bool { return strings.HasSuffix(p, ",0") })
		})
		t.Logf("discovery through %s names vm1 at %v", n.name, got)
		seen := map[string]bool{}
		for _, p := range got {
			addr, tag, ok := strings.Cut(p, ",")
			if !ok || tag == "" {
				t.Fatalf("%s: portal %q without a tag", n.name, p)
			}
			if prev, ok := tags[addr]; ok && prev != tag {
				t.Fatalf("%s answers %s with tag %s, another node with %s", n.name, addr, tag, prev)
			}
			tags[addr] = tag
			if seen[tag] {
				t.Fatalf("%s: tag %s twice in %v", n.name, tag, got)
			}
			seen[tag] = true
			delete(seen, "")
		}
		for addr := range want {
			if _, ok := tags[addr]; !ok {
				t.Fatalf("%s's discovery %v lacks %s", n.name, got, addr)
			}
		}
		if strings.Contains(strings.Join(got, " "), n2.portal+",") {
			t.Fatalf("%s named n2's bound address instead of its advertised one: %v", n.name, got)
		}
		if n == n3 && !slices.Contains(got, n3.portal+","+tags[n3.portal]) {
			t.Fatalf("n3, asked itself, does not name its own portal: %v", got)
		}
		if n == n1 && slices.ContainsFunc(got, func(p string) bool { return strings.HasPrefix(p, n4.portal+",") }) {
			t.Fatalf("n1 names n4, which neither holds nor owns vm1: %v", got)
		}
	}

	// VPD 0x83 through each path: the same LU designators, and the port's
	// relative target port and group (libiscsi does not print their
	// binary values: the guest test compares them, with sg_vpd).
	lu := ""
	for _, n := range []*node{n1, n2, n3} {
		out, err := run(t, 20*time.Second, "iscsi-inq", "-e", "1", "-c", "131", n.url("vm1"))
		if err != nil {
			t.Fatalf("VPD 0x83 through %s: %v\n%s", n.name, err, out)
		}
		if !strings.Contains(out, "TARGET_PORT_GROUP") || !strings.Contains(out, "RELATIVE_TARGET_PORT") || !strings.Contains(out, "NAA") {
			t.Fatalf("%s: VPD 0x83 lacks the NAA, relative target port or target port group designator:\n%s", n.name, out)
		}
		if lu == "" {
			lu = out
			t.Logf("VPD 0x83 through %s:\n%s", n.name, out)
		} else if out != lu {
			t.Fatalf("%s reports other designators:\n%s\nthan n1:\n%s", n.name, out, lu)
		}
		inq, err := run(t, 20*time.Second, "iscsi-inq", n.url("vm1"))
		t.Logf("INQUIRY through %s:\n%s", n.name, inq)
		if err != nil || !regexp.MustCompile(`(?i)TPGS:\s*(0x)?1\b`).MatchString(inq) || !strings.Contains(inq, "MultiP:1") {
			t.Fatalf("standard INQUIRY through %s does not report implicit ALUA: %v\n%s", n.name, err, inq)
		}
	}
}
