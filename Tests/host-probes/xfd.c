// Probe: can the VMM arm XFD for tile data (after ARCH_REQ_XCOMP_GUEST_PERM) so that guest user code
// touching AMX tile data faults? Guest at CPL3: ldtilecfg; out 0x80; tilezero tmm0; out 0x81.
// With an IDT whose #NM (7) gate points at code that does out 0x87 (reads XFD_ERR? no: CPL0 rdmsr emulated).
#include <fcntl.h>
#include <linux/kvm.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <stdint.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <unistd.h>
#define MEMSZ (64ul<<20)
int main(int argc,char**argv){
  if(syscall(SYS_arch_prctl,0x1025,18)!=0) perror("ARCH_REQ_XCOMP_GUEST_PERM");
  int kvm=open("/dev/kvm",O_RDWR|O_CLOEXEC); int vm=ioctl(kvm,KVM_CREATE_VM,0);
  ioctl(vm,KVM_SET_TSS_ADDR,0xfffbd000);
  uint8_t*mem=mmap(NULL,MEMSZ,PROT_READ|PROT_WRITE,MAP_SHARED|MAP_ANONYMOUS|MAP_NORESERVE,-1,0);
  struct kvm_userspace_memory_region r={.slot=0,.guest_phys_addr=0,.memory_size=MEMSZ,.userspace_addr=(unsigned long)mem};
  ioctl(vm,KVM_SET_USER_MEMORY_REGION,&r);
  uint64_t*gdt=(uint64_t*)(mem+0x500); gdt[0]=0; gdt[1]=0x00af9b000000ffffull; gdt[2]=0x00cf93000000ffffull;
  gdt[3]=0; gdt[4]=0x00cff3000000ffffull; gdt[5]=0x00affb000000ffffull;
  // 64-bit TSS at 0x600 in gdt[6..7]: base 0x1000, limit 0x67
  gdt[6]=0x0000890010000067ull; gdt[7]=0; uint64_t*tss=(uint64_t*)(mem+0x1000); memset(tss,0,0x68); *(uint64_t*)((uint8_t*)tss+4)=0x7000; // rsp0
  uint64_t*pml4=(uint64_t*)(mem+0x9000),*pdpt=(uint64_t*)(mem+0xa000),*pd=(uint64_t*)(mem+0xb000);
  pml4[0]=0xa000|7; pdpt[0]=0xb000|7; for(int i=0;i<32;i++) pd[i]=(i<<21)|0x87;
  // IDT at 0xc000: every vector -> handler at 0x2800 + vector*16: mov al,vec; out 0x87,al; hlt
  uint64_t*idt=(uint64_t*)(mem+0xc000);
  for(int v=0;v<32;v++){ uint64_t h=0x2800+v*16; idt[2*v]=(h&0xffff)|(8ull<<16)|(0x8eull<<40)|((h>>16&0xffff)<<48); idt[2*v+1]=h>>32;
    uint8_t st[]={0xb0,(uint8_t)v,0xe6,0x87,0xf4}; memcpy(mem+h,st,sizeof st);}
  int vcpu=ioctl(vm,KVM_CREATE_VCPU,0);
  struct kvm_run*run=mmap(NULL,ioctl(kvm,KVM_GET_VCPU_MMAP_SIZE,0),PROT_READ|PROT_WRITE,MAP_SHARED,vcpu,0);
  struct {struct kvm_cpuid2 c; struct kvm_cpuid_entry2 e[100];} cp={.c.nent=100};
  ioctl(kvm,KVM_GET_SUPPORTED_CPUID,&cp);
  for(unsigned i=0;i<cp.c.nent;i++){struct kvm_cpuid_entry2*e=&cp.e[i]; if(e->function==0xd&&e->index<2) printf("supported 0xd.%d eax=%x ecx=%x\n",e->index,e->eax,e->ecx); if(e->function==7&&e->index==0) printf("supported 7.0 edx=%x (amx tile bit24=%d)\n",e->edx,(e->edx>>24)&1);}
  if(ioctl(vcpu,KVM_SET_CPUID2,&cp)<0) perror("set cpuid");
  struct {struct kvm_msrs m; struct kvm_msr_entry e[1];} ms={.m.nmsrs=1,.e[0]={.index=0x1c4,.data=1ull<<18}};
  printf("KVM_SET_MSRS XFD: %d\n",ioctl(vcpu,KVM_SET_MSRS,&ms));
  struct kvm_sregs s; ioctl(vcpu,KVM_GET_SREGS,&s);
  struct kvm_segment cs={.base=0,.limit=0xfffff,.selector=0x2b,.type=11,.present=1,.dpl=3,.s=1,.l=1,.g=1};
  struct kvm_segment ds={.base=0,.limit=0xfffff,.selector=0x23,.type=3,.present=1,.dpl=3,.db=1,.s=1,.g=1};
  struct kvm_segment tr={.base=0x1000,.limit=0x67,.selector=0x30,.type=11,.present=1};
  s.cs=cs; s.ds=s.es=s.fs=s.gs=s.ss=ds; s.tr=tr; s.gdt.base=0x500; s.gdt.limit=63; s.idt.base=0xc000; s.idt.limit=32*16-1;
  s.cr0=0x80000033; s.cr3=0x9000; s.cr4=0x20|0x600|(1<<18); s.efer=0x500; ioctl(vcpu,KVM_SET_SREGS,&s);
  uint8_t c[64]={0}; c[0]=1; c[16]=64; c[48]=16; memcpy(mem+0x4000,c,64);
  uint8_t code[]={ 0xc4,0xe2,0x78,0x49,0x04,0x25,0x00,0x40,0,0, 0xe7,0x80, 0xc4,0xe2,0x7b,0x49,0xc0, 0xe7,0x81, 0xf4};
  memcpy(mem+0x3000,code,sizeof code);
  struct kvm_regs g={0}; g.rip=0x3000; g.rsp=0x8000; g.rflags=2; ioctl(vcpu,KVM_SET_REGS,&g);
  for(int i=0;i<4;i++){ if(ioctl(vcpu,KVM_RUN,0)<0){perror("run");break;}
    if(run->exit_reason==KVM_EXIT_IO){ printf("out 0x%x al=%d\n",run->io.port,*((uint8_t*)run+run->io.data_offset)); if(run->io.port==0x87){
        struct {struct kvm_msrs m; struct kvm_msr_entry e[2];} q={.m.nmsrs=2,.e={{.index=0x1c5},{.index=0x1c4}}}; int n=ioctl(vcpu,KVM_GET_MSRS,&q); printf("GET_MSRS n=%d XFD_ERR=%llx XFD=%llx\n",n,q.e[0].data,q.e[1].data); break;}
      if(run->io.port==0x81)break; continue;}
    printf("exit %d\n",run->exit_reason); break;}
}
