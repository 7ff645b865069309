package cli

import (
	"fmt"
	"strconv"
	"strings"
)

// ParseSize reads a size in bytes with an optional binary unit: 4096, 64K,
// 512M, 10G, 2T (also KiB/MiB/GiB/TiB and K/M/G/T followed by B). Units are
// powers of 1024.
func ParseSize(s string) (int64, error) {
	t := strings.ToUpper(strings.TrimSpace(s))
	t = strings.TrimSuffix(strings.TrimSuffix(t, "B"), "I")
	mult := int64(1)
	if t != "" {
		switch t[len(t)-1] {
		case 'K':
			mult = 1 << 10
		case 'M':
			mult = 1 << 20
		case 'G':
			mult = 1 << 30
		case 'T':
			mult = 1 << 40
		case 'P':
			mult = 1 << 50
		}
		if mult > 1 {
			t = t[:len(t)-1]
		}
	}
	n, err := strconv.ParseInt(t, 10, 64)
	if err != nil || n < 0 {
		return 0, fmt.Errorf("invalid size %q: want a whole number with an optional unit K, M, G, T, P (e.g. 10G, 512M)", s)
	}
	if n > (1<<62)/mult {
		return 0, fmt.Errorf("invalid size %q: too large", s)
	}
	return n * mult, nil
}

// FormatSize prints bytes with the largest binary unit not above them:
// exact values as integers (10G), others with one decimal (251.9G).
func FormatSize(n int64) string {
	units := []string{"", "K", "M", "G", "T", "P"}
	i := 0
	for i < len(units)-1 && n >= int64(1)<<(10*(i+1)) {
		i++
	}
	div := int64(1) << (10 * i)
	if n%div == 0 {
		return fmt.Sprintf("%d%s", n/div, units[i])
	}
	return fmt.Sprintf("%.1f%s", float64(n)/float64(div), units[i])
}
