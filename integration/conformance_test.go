package integration

import (
	"bufio"
	"flag"
	"fmt"
	"maps"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"slices"
	"sort"
	"strings"
	"testing"
	"time"
)

var updateExpected = flag.Bool("update-expected", false, "rewrite integration/conformance/expected.txt from this run")

// gotgtCIList is the iscsi-test-cu case list gotgt's own CI runs
// (test/libiscsi-gotgt-test.sh); tgtd passes all of it here. ukai must too.
var gotgtCIList = strings.Fields(`ALL.Inquiry.Standard ALL.Inquiry.AllocLength ALL.Inquiry.MandatoryVPDSBC ALL.Inquiry.SupportedVPD
ALL.Inquiry.VersionDescriptors ALL.Inquiry.EVPD ALL.Mandatory ALL.ModeSense6
ALL.Prefetch10 ALL.Prefetch16 ALL.PreventAllow ALL.ReadCapacity10 ALL.ReadCapacity16 ALL.Read6
ALL.Read10 ALL.Read12 ALL.Read16 ALL.ReadOnly ALL.ReportSupportedOpcodes.Simple ALL.Reserve6.Simple
ALL.StartStopUnit ALL.TestUnitReady ALL.Write10 ALL.Write16 ALL.Write12 ALL.WriteVerify10
ALL.WriteVerify16 ALL.WriteVerify12 ALL.WriteSame10.Simple ALL.WriteSame16.Simple ALL.Verify10
ALL.Verify12 ALL.Verify16 ALL.iSCSITMF ALL.iSCSIcmdsn ALL.Unmap.Simple ALL.Unmap.VPD ALL.Unmap.ZeroBlocks`)

// allCases lists every case of the ALL family (the SBC, SPC and iSCSI
// suites), as FAMILY.SUITE.TEST.
func allCases(t *testing.T) []string {
	out, err := exec.Command("iscsi-test-cu", "--list").Output()
	if err != nil {
		t.Fatal(err)
	}
	var cases []string
	for _, l := range strings.Fields(string(out)) {
		if strings.HasPrefix(l, "ALL.") && strings.Count(l, ".") == 2 {
			cases = append(cases, l)
		}
	}
	return cases
}

// expand turns suite names into their cases.
func expand(list, all []string) []string {
	var out []string
	for _, e := range list {
		if strings.Count(e, ".") == 2 {
			out = append(out, e)
			continue
		}
		for _, c := range all {
			if strings.HasPrefix(c, e+".") {
				out = append(out, c)
			}
		}
	}
	return out
}

var (
	summaryRE = regexp.MustCompile(`(?m)^\s+tests\s+(\d+)\s+(\d+)\s+(\d+)\s+(\d+)`)
	tagRE     = regexp.MustCompile(`<[^>]+>`)
	recordRE  = regexp.MustCompile(`<CUNIT_RUN_TEST_(SUCCESS|FAILURE)>\s*<TEST_NAME>\s*(\S+)\s*</TEST_NAME>(?s:(.*?))</CUNIT_RUN_TEST_(?:SUCCESS|FAILURE)>`)
)

// runSuite runs one iscsi-test-cu suite (ALL.SUITE) in XML mode and returns
// CUnit's verdict per case (skips count as passes, as CUnit counts them)
// and the failed conditions. Cases of a suite that hung or crashed have no
// verdict and count as failures. Suites, not single cases, are the unit:
// some cases (iSCSITMF.LUNResetSimpleAsync) only work after their
// predecessors in the suite, on tgtd as on ukai.
func runSuite(t *testing.T, url, suite string) (map[string]bool, map[string]string) {
	dir := t.TempDir()
	cmd := exec.Command("iscsi-test-cu", "-d", "-x", "--test="+suite, url)
	cmd.Dir = dir
	out, err := runWithTimeout(cmd, 3*time.Minute)
	data, rerr := os.ReadFile(filepath.Join(dir, "CUnitAutomated-Results.xml"))
	pass, why := map[string]bool{}, map[string]string{}
	if rerr != nil {
		t.Logf("suite %s on %s: no results (%v, %v): %s", suite, url, err, rerr, lastLines(out, 5))
		return pass, why
	}
	for _, m := range recordRE.FindAllStringSubmatch(string(data), -1) {
		c := suite + "." + m[2]
		if m[1] == "SUCCESS" {
			if _, seen := pass[c]; !seen {
				pass[c] = true
			}
			continue
		}
		pass[c] = false
		why[c] += strings.Join(strings.Fields(tagRE.ReplaceAllString(m[3], " ")), " ") + "; "
	}
	return pass, why
}

func suiteOf(c string) string { return strings.Split(c, ".")[1] }

func lastLines(s string, n int) string {
	ls := strings.Split(strings.TrimSpace(s), "\n")
	return strings.Join(ls[max(0, len(ls)-n):], "\n")
}

// lastTgtdPid is the process of the tgtd started last (the benchmark
// measures its CPU time).
var lastTgtdPid int

// tgtd starts a tgtd on loopback with a file-backed LUN 1 and returns the
// URL of that LUN.
func startTgtd(t *testing.T, size int64) string { return startTgtdCHAP(t, size, "", "") }

// startTgtdCHAP is startTgtd; with user set, every login needs CHAP with
// user and secret (the URL carries them).
func startTgtdCHAP(t *testing.T, size int64, user, secret string) string {
	t.Helper()
	port := freePort(t)
	ctl := fmt.Sprint(1000 + port%20000)
	cmd := exec.Command("tgtd", "-f", "-C", ctl, "--iscsi", fmt.Sprintf("portal=127.0.0.1:%d", port))
	logf, _ := os.Create(filepath.Join(t.TempDir(), "tgtd.log"))
	cmd.Stdout, cmd.Stderr = logf, logf
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { cmd.Process.Kill(); cmd.Wait() })
	lastTgtdPid = cmd.Process.Pid
	img := filepath.Join(t.TempDir(), "tgt.img")
	if err := os.WriteFile(img, nil, 0o600); err != nil {
		t.Fatal(err)
	}
	if err := os.Truncate(img, size); err != nil {
		t.Fatal(err)
	}
	iqn := "iqn.2026-11.io.ukai.test:tgtd"
	adm := func(args ...string) error {
		out, err := exec.Command("tgtadm", append([]string{"-C", ctl, "--lld", "iscsi"}, args...)...).CombinedOutput()
		if err != nil {
			return fmt.Errorf("tgtadm %v: %v: %s", args, err, out)
		}
		return nil
	}
	waitFor(t, 10*time.Second, "tgtd's control socket", func() bool {
		return adm("--op", "show", "--mode", "target") == nil
	})
	ops := [][]string{
		{"--op", "new", "--mode", "target", "--tid", "1", "-T", iqn},
		{"--op", "new", "--mode", "logicalunit", "--tid", "1", "--lun", "1", "-b", img},
		{"--op", "bind", "--mode", "target", "--tid", "1", "-I", "ALL"},
	}
	cred := ""
	if user != "" {
		ops = append(ops, []string{"--op", "new", "--mode", "account", "--user", user, "--password", secret},
			[]string{"--op", "bind", "--mode", "account", "--tid", "1", "--user", user})
		cred = user + "%" + secret + "@"
	}
	for _, a := range ops {
		if err := adm(a...); err != nil {
			t.Fatal(err)
		}
	}
	return fmt.Sprintf("iscsi://%s127.0.0.1:%d/%s/1", cred, port, iqn)
}

// TestConformance runs libiscsi's iscsi-test-cu, case by case, against ukai
// and against tgtd (file-backed LUN, same size) in the same run. ukai must
// pass all of gotgt's CI list, and must not regress against the expected
// list checked in at integration/conformance/expected.txt.
func TestConformance(t *testing.T) {
	for _, chap := range []bool{false, true} {
		name := "CHAP-off"
		if chap {
			name = "CHAP-on"
		}
		t.Run(name, func(t *testing.T) { conformance(t, chap) })
	}
}

// conformance runs every suite against ukai and tgtd, both with CHAP (an
// export to every initiator with a CHAP account) or both without.
func conformance(t *testing.T, chap bool) {
	const size = 128 << 20
	const user, secret = "conformance", "conformance-secret-0123"
	var n *node
	var ukaiURL, tgtURL string
	if chap {
		n = newClusterNode(t, "n1", clusterOpts{requireACL: true})
		cfg, _ := os.ReadFile(n.cfgPath)
		os.WriteFile(n.cfgPath, []byte(strings.Replace(string(cfg), "  require_acl: true\n", "  require_acl: true\n  chap_secret_store: consul\n", 1)), 0o600)
		n.start()
		n.mustCLI("image", "create", "conformance", "--size", fmt.Sprint(size), "--block-size", "1M")
		sf := filepath.Join(t.TempDir(), "secret")
		os.WriteFile(sf, []byte(secret), 0o600)
		// Every initiator name (iscsi-test-cu uses two), with CHAP.
		n.mustCLI("image", "export", "conformance", "--initiator", "*", "--chap-user", user, "--chap-secret-file", sf)
		ukaiURL = strings.Replace(n.url("conformance"), "iscsi://", "iscsi://"+user+"%"+secret+"@", 1)
		tgtURL = startTgtdCHAP(t, size, user, secret)
		// Without the credentials: refused.
		if out, err := run(t, 30*time.Second, "iscsi-inq", n.url("conformance")); err == nil {
			t.Fatalf("a login without CHAP was admitted: %s", out)
		}
	} else {
		n = newNode(t, "n1")
		n.start()
		n.mustCLI("image", "create", "conformance", "--size", fmt.Sprint(size), "--block-size", "1M")
		ukaiURL = n.url("conformance")
		tgtURL = startTgtd(t, size)
	}

	all := allCases(t)
	ci := expand(gotgtCIList, all)
	if len(ci) < 100 || len(all) < 200 {
		t.Fatalf("case lists look wrong: %d CI cases, %d in ALL", len(ci), len(all))
	}
	type res struct{ ukai, tgtd bool }
	results := map[string]res{}
	var suites []string
	for _, c := range all {
		if s := "ALL." + suiteOf(c); !slices.Contains(suites, s) {
			suites = append(suites, s)
		}
	}
	var ukaiFail []string
	for _, s := range suites {
		u, why := runSuite(t, ukaiURL, s)
		g, _ := runSuite(t, tgtURL, s)
		for _, c := range all {
			if strings.HasPrefix(c, s+".") {
				results[c] = res{u[c], g[c]}
				if !u[c] {
					ukaiFail = append(ukaiFail, c+": "+why[c])
				}
			}
		}
		// The node must survive every suite.
		if _, _, err := n.cli("version"); err != nil {
			t.Fatalf("ukai died during %s:\n%s", s, n.logs)
		}
	}
	count := func(list []string, f func(res) bool) int {
		k := 0
		for _, c := range list {
			if f(results[c]) {
				k++
			}
		}
		return k
	}
	ukaiOK := func(r res) bool { return r.ukai }
	tgtOK := func(r res) bool { return r.tgtd }
	t.Logf("\n| case set | cases | ukai pass | ukai fail | tgtd pass | tgtd fail |\n|---|---|---|---|---|---|\n"+
		"| gotgt CI list | %d | %d | %d | %d | %d |\n| ALL (SBC, SPC, iSCSI) | %d | %d | %d | %d | %d |",
		len(ci), count(ci, ukaiOK), len(ci)-count(ci, ukaiOK), count(ci, tgtOK), len(ci)-count(ci, tgtOK),
		len(all), count(all, ukaiOK), len(all)-count(all, ukaiOK), count(all, tgtOK), len(all)-count(all, tgtOK))
	for _, f := range ukaiFail {
		t.Logf("ukai fails %s", f)
	}
	for _, c := range ci {
		if !results[c].ukai {
			t.Errorf("ukai fails %s from gotgt's CI list (tgtd passes: %v)", c, results[c].tgtd)
		}
	}
	for _, c := range all {
		if results[c].tgtd && !results[c].ukai {
			t.Errorf("ukai fails %s, which tgtd passes", c)
		}
	}
	if chap {
		// The expected list is the CHAP-off run's; with CHAP, matching
		// tgtd (above) is the bar.
		return
	}

	path := filepath.Join("conformance", "expected.txt")
	if *updateExpected {
		var b strings.Builder
		b.WriteString("# iscsi-test-cu cases ukai passes (pass) or fails (fail); `go test ./integration -run TestConformance -update-expected` rewrites it.\n")
		keys := slices.Sorted(maps.Keys(results))
		for _, c := range keys {
			v := "fail"
			if results[c].ukai {
				v = "pass"
			}
			fmt.Fprintf(&b, "%s %s\n", c, v)
		}
		if err := os.WriteFile(path, []byte(b.String()), 0o644); err != nil {
			t.Fatal(err)
		}
		return
	}
	f, err := os.Open(path)
	if err != nil {
		t.Fatalf("%v (create it with -update-expected)", err)
	}
	defer f.Close()
	var improved []string
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		fs := strings.Fields(sc.Text())
		if len(fs) != 2 || strings.HasPrefix(fs[0], "#") {
			continue
		}
		r, ok := results[fs[0]]
		switch {
		case !ok:
			t.Errorf("expected list names %s, which this iscsi-test-cu does not have", fs[0])
		case fs[1] == "pass" && !r.ukai:
			t.Errorf("regression: %s passed before and fails now", fs[0])
		case fs[1] == "fail" && r.ukai:
			improved = append(improved, fs[0])
		}
	}
	sort.Strings(improved)
	if len(improved) > 0 {
		t.Logf("now passing, update the expected list: %s", strings.Join(improved, " "))
	}
}
